"""python -m models: the registered architectures, and the kernel_cnn variants side by side."""
from . import describe_model, list_models
from .kernel_cnn import format_kernel_variants, kernel_variants

for name in list_models():
    print(f"{name:18s} {describe_model(name)}")
print("\nkernel_cnn variants (defaults: 10 classes, 3 channels, 32x32):")
print(format_kernel_variants(kernel_variants()))
