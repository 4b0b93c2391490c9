from align.cli import entrypoint

entrypoint()
