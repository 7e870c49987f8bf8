from graphsparse.cli import main

main()
