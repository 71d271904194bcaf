"""moecpt.model"""
