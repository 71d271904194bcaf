"""moecpt.data"""
