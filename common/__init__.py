"""What the coordinator and the sites share: config, models, adapter math, wire format."""
