from blockmgr.server import main

main()
