"""cxrlite.quantize"""
