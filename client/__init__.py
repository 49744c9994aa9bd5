"""The site: data loading, local LoRA training and evaluation, and the Flower ClientApp glue."""
