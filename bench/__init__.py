"""cxrlite.bench"""
