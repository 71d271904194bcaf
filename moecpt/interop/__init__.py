"""moecpt.interop"""
