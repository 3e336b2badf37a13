"""flexrank.device_profiles"""
