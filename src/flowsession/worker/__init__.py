"""Code that runs INSIDE a flow's environment: stdlib and promptflow only.

Never import flowsession's control-plane modules (or their dependencies) from here: this package
is put on the environment's PYTHONPATH, where only the image's and the flow's packages exist.
"""
