"""Placeholder main job; replaced by the HAE demo."""
