"""What is measured: the sweep's axes and cells, the presets, and the flow models built around a layer."""
