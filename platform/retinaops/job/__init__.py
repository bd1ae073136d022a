"""The job: its YAML spec, the sweep space, the settings from the environment, and the `Job` resolved once from them."""
