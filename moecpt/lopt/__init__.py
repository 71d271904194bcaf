"""moecpt.lopt"""
