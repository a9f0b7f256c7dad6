"""Side-by-side comparison of methods and the training-speed benchmark."""
