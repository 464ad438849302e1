"""Small ready-made data modules and models (like ``lightning.pytorch.demos``)."""
