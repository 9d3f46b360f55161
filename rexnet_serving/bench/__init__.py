"""rexnet-bench: load tests of the ReXNet service over HTTP, gRPC and bRPC, side by side with two baselines
(the in-process limit and Paddle Serving's documented Pipeline example) in one run. See README.md here."""
