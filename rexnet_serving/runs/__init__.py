"""What every "classify many image files into one result file" tool shares: rexnet-batch (through a
service) and rexnet-predict (in process).

``inputs`` expands folders, globs and list files; ``output`` appends one record per image and resumes an
interrupted run; ``summary`` counts and picks the exit code; ``cli`` holds the shared flags.
"""
