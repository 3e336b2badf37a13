"""flexrank.planning: which rank each layer keeps at each budget.

The sensitivity matrix (`sensitivity`), cost models (`costs`, `latency_table`), exact
multi-choice knapsack solvers (`knapsack`), the nested planner (`planner`), the uniform
and energy baselines (`baselines`) and the rank heat-map (`heatmap`). numpy only: nothing
here imports torch, and onnx/onnxruntime only when a latency table is measured.
"""
