"""moecpt.analysis"""
