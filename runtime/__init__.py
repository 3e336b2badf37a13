"""flexrank.runtime"""
