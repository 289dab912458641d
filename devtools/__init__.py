"""What the tests, the benchmarks and the load tests share: test images, a slow reference
decoder, a tritonserver started from nvidia-pytriton, synthetic network outputs, INT8 accuracy
measurement. Never imported by the training job or the service; nothing imports from tests/.
"""
