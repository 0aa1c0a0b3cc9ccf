"""filled by the defense issue"""
