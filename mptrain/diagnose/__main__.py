from mptrain.diagnose.cli import main

main()
