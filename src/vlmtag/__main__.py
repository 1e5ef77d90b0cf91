from vlmtag.cli import main

main()
