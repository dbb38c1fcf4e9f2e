"""Peer servers a benchmark runs beside our doors, on the same model and the same machine: llama.cpp's llama-server
and `vllm serve`."""
