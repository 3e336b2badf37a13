"""ONNX and ORT-format export: `export` (the registered exporters and the three layouts),
`convert` (torch -> ONNX, int8, ORT format), `simplify`/`attention`/`graph` (graph
rewrites for onnxruntime), `layouts` (shared and elastic files), `bundle` (reading a
per-budget bundle back through optimum)."""
