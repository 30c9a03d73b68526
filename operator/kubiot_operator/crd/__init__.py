"""CustomResourceDefinitions: generated from the models, and validation against them."""
