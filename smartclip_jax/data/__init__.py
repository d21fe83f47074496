"""Input data: the embedded demo set, caption samplers and Grain pipelines."""
