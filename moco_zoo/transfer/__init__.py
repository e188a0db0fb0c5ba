"""Transfer to detection, instance and semantic segmentation: models, datasets, engine, evaluators."""
