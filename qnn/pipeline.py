"""filled later"""
COMMANDS = {}
