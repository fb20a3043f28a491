"""`pdcluster plan` and `pdcluster calibrate`: choose each tier's mesh and replica count from the model, the
hardware and the latency targets (docs/planner.md).

Modules, one concern each: `hardware` (GPU ceilings: built-in table, calibration files), `model_shape` (the model's
bytes and FLOPs), `traffic` (arrival rate, lengths, targets), `volumes` (closed-form communication volumes),
`cost_model` (memory and time per phase), `search` (the placement search), `report` (text output),
`write_config` (--write into cluster.yaml), `calibrate` (measurements with torch), `cli` (the subcommands).
"""
