"""The calibration core: what is measured (collector), where tensors wait (store), the two engines that run the
model (whole, stream) and the calibration folder on disk."""
