"""What reads or drives runs beyond `fit`: sweep, compare (and its plot), inspect, export (npz,
safetensors, ONNX, torch-prune, ticket) and bench. cli.py parses and prints; these do the work."""
