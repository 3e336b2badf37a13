"""File-format constants shared by every writer and reader of that format (one home each)."""

# onnx 1.23's make_model writes IR 14, which onnxruntime (max 13 in 1.31/1.32) refuses.
ONNX_IR_VERSION = 10
# The opset of the hand-built graphs (layer timing); exported models use optimum's choice.
ONNX_OPSET = 17
# The elastic ONNX graph's int64 input [1] that picks the budget (0 = smallest): written by
# flexrank.exporters.onnx.layouts, fed by flexrank.runtime, which may not import exporters.
RANK_LEVEL = "rank_level"
