"""What every "classify many image files into one result file" tool shares: rexnet-batch (through a
service) and rexnet-predict (in process).

``inputs`` expands folders, globs and list files (local or object-store URLs: ``storage``); ``shards``
picks one of N processes' part of them; ``run`` opens (or resumes) the result file, staged and committed
for a URL; ``output`` appends one JSONL/CSV record per image and repairs a torn file, ``parquet`` writes
the Parquet form; ``summary`` counts and picks the exit code; ``progress`` reports on stderr; ``merge``
checks that the shards hold every input exactly once; ``cli`` holds the shared flags.
"""
