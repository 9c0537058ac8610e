"""cxrlite.export"""
