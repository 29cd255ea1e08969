"""Jinja2 launch-script templates, one per target; rendered from typed contexts."""
