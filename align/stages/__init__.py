"""One module per stage, each with `run(config) -> Path`. Stages never import each other."""
