"""Environments: a flow's uv-built virtual environment over an image, and the images."""

DEFAULT_IMAGE = "flowsession/runtime"  # the image a flow runs on when it names none
