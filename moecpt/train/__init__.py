"""moecpt.train"""
