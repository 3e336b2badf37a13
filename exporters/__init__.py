"""flexrank.exporters"""
