"""cxrlite.train"""
