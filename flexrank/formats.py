"""File-format versions shared by every writer of that format (one home each)."""

# onnx 1.23's make_model writes IR 14, which onnxruntime (max 13 in 1.31/1.32) refuses.
ONNX_IR_VERSION = 10
# The opset of the hand-built graphs (layer timing); exported models use optimum's choice.
ONNX_OPSET = 17
