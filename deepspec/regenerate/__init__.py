"""regenerate"""
