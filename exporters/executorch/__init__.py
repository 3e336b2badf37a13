"""ExecuTorch export: `export` (the registered exporter), `program` (torch.export ->
XNNPACK .pte), `quant` (8da4w), `validate` (the .pte against PyTorch)."""
