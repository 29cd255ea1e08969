"""The spec: its pydantic models, the block-pattern grammar, YAML loading and the cluster presets."""
