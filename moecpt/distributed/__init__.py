"""moecpt.distributed"""
