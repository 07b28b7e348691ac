from executor.server import main

main()
