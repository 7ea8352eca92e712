"""The formats every layer reads: tensor dtype names and where a tensor's bytes sit in
safetensors files. Leaves: they import nothing else from livetrain."""
