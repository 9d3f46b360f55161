"""bRPC (baidu_std) serving: a native Python GeneralModelService endpoint and the C++ Serving backend."""
