"""Side-by-side benchmarks of our RetinaNet against torchvision's: `python -m benchmarks.run --help`."""
