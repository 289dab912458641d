"""The detection gateway: FastAPI over Triton (gRPC) or the embedded ONNX Runtime backend.

No torch and no training code here: the model repository is the contract (see ssdcore).
"""
