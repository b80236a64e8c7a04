from trainctl.launcher.cli import main

main()
